"""Which teacher scores which domain.

Registration is where mistakes are cheapest to catch, so a teacher whose tokenizer differs from the
student's is refused here, and a domain served twice is refused here, long before any rollout.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer

from teachers.tokenizer_check import tokenizer_mismatch


class TeacherRegistryError(ValueError):
    pass


class UnknownDomainError(TeacherRegistryError):
    pass


@dataclass
class TeacherSpec:
    name: str
    domains: list[str]
    path: str
    backend: str = "vllm"
    replicas: int = 1
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)


class TeacherRegistry:
    def __init__(self, student_tokenizer: Any | None = None, default_teacher: str | None = None) -> None:
        self.student_tokenizer = student_tokenizer
        self.default_teacher = default_teacher
        self.teachers: dict[str, TeacherSpec] = {}
        self._by_domain: dict[str, str] = {}

    @classmethod
    def from_config(cls, cfg: Any, student_tokenizer: Any | None = None) -> TeacherRegistry:
        """Build from a `MopdConfig` (its `teachers` and `data.default_teacher`)."""
        reg = cls(student_tokenizer)
        for name, t in cfg.teachers.items():
            reg.register(name, t.domains, t.path, backend=t.backend, replicas=t.replicas, dtype=t.dtype)
        reg.set_default(cfg.data.default_teacher)
        return reg

    def register(self, name: str, domains: list[str], path: str, *, backend: str = "vllm", replicas: int = 1,
                 dtype: str = "float32", tokenizer: Any | None = None, **extra: Any) -> TeacherSpec:
        if name in self.teachers:
            raise TeacherRegistryError(f"teacher '{name}' is already registered; pick another name")
        if not domains:
            raise TeacherRegistryError(f"teacher '{name}' serves no domain; give it at least one")
        for d in domains:
            if d in self._by_domain:
                raise TeacherRegistryError(
                    f"domain '{d}' is already served by teacher '{self._by_domain[d]}'; "
                    f"a domain has exactly one teacher (remove it from '{name}' or from '{self._by_domain[d]}')")
        if self.student_tokenizer is not None:
            if tokenizer is None:
                tokenizer = _load_tokenizer(name, path)
            diff = tokenizer_mismatch(self.student_tokenizer, tokenizer)
            if diff:
                raise TeacherRegistryError(
                    f"teacher '{name}' ({path}) does not share the student's tokenizer: {diff}. "
                    "The dense reward compares log-probs of the same token ids, so a teacher must use the "
                    "student's tokenizer exactly (vocabulary and special tokens); use a teacher of the same "
                    "tokenizer family or re-save it with the student's tokenizer.")
        spec = TeacherSpec(name, list(domains), path, backend, replicas, dtype, extra)
        self.teachers[name] = spec
        for d in domains:
            self._by_domain[d] = name
        return spec

    def set_default(self, name: str | None) -> None:
        if name is not None and name not in self.teachers:
            raise TeacherRegistryError(f"default teacher '{name}' is not registered; registered: {sorted(self.teachers)}")
        self.default_teacher = name

    @property
    def domains(self) -> list[str]:
        return sorted(self._by_domain)

    def teacher_for(self, domain: str, row_id: str | None = None) -> str:
        name = self._by_domain.get(domain, self.default_teacher)
        if name is None:
            where = f"row '{row_id}' has domain" if row_id is not None else "domain"
            raise UnknownDomainError(
                f"{where} '{domain}', which no teacher serves; registered domains: "
                f"{', '.join(self.domains) or '(none)'}. Register a teacher for it "
                f"(teachers.<name>.domains in the config) or set data.default_teacher.")
        return name

    def group(self, domains: list[str], row_ids: list[str] | None = None) -> dict[str, list[int]]:
        """Indices of items per teacher, so each teacher scores its samples in one batch."""
        out: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(domains):
            out[self.teacher_for(d, None if row_ids is None else row_ids[i])].append(i)
        return dict(out)


def _load_tokenizer(name: str, path: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        raise TeacherRegistryError(
            f"teacher '{name}': cannot load a tokenizer from {path!r} ({type(e).__name__}: {e}); "
            "point teachers.<name>.path at a Hugging Face model folder") from None
