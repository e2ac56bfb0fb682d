"""Plain Markdown tables for the terminal, the run directory and closing notes."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def round_table(summary: dict[str, dict[str, float]]) -> str:
    rows = [[d, s["acc"], s["teacher_kl"], s["response_length"], int(s["prompts"])] for d, s in summary.items()]
    return markdown_table(["domain", "student acc (greedy)", "teacher KL", "response len", "prompts"], rows)


def headroom_captured(before: float, after: float, teacher: float) -> float:
    """`(after - before) / (teacher - before)`: the share of the gap to the teacher that training closed, the
    quantity Open-MOPD (arXiv 2608.19098) reports per domain. NaN when the teacher is not above the student."""
    gap = teacher - before
    return (after - before) / gap if gap > 0 else float("nan")


def result_table(result: dict) -> str:
    """Per domain: student before / teacher / student after, headroom captured, and teacher KL before / after."""
    rows = []
    for d, b in result["before"].items():
        af = result["after"].get(d, {})
        teacher = result.get("teacher", {}).get(d, float("nan"))
        after = af.get("acc", float("nan"))
        ratio = after / teacher if teacher and teacher == teacher else float("nan")
        rows.append([d, b["acc"], teacher, after, ratio, headroom_captured(b["acc"], after, teacher),
                     b["teacher_kl"], af.get("teacher_kl", float("nan"))])
    head = (f"{result['experiment']}: objective={result['objective']}, {result['steps']} steps, "
            f"{result['train_s']:.0f} s of training\n\n")
    return head + markdown_table(
        ["domain", "student before", "teacher", "student after", "after/teacher", "headroom captured",
         "teacher KL before", "teacher KL after"], rows)

