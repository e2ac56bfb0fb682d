"""The quickstart world's model sizes (torch-free, so that the `world:` config section can check overrides
of them without importing torch): `mopd.world.models` builds from these, `world.teacher_size` /
`world.student_size` override single keys."""

from __future__ import annotations

from typing import Any

TEACHER_SIZE: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32,
)
# As many attention heads as the teacher (4): with 2 heads the student stayed at ~3% on addition after 400
# add-only SFT steps (4 heads: 70%), so it could not learn addition from its own samples within the
# quickstart's 10 minutes either, while reversal and sorting were fine. With 2 layers it could not get
# past ~0% on addition at all.
STUDENT_SIZE: dict[str, Any] = dict(
    hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256,
)
