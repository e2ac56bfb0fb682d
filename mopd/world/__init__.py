"""The quickstart world: synthetic domains, their dense teachers and a warm-started MoE student."""
