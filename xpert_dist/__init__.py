"""xpert-dist: sparse, domain-adapted experts from one LoRA fine-tuning run (EfficientXpert), at cluster scale.

The layers, in the order they may import each other: maths, config, models, data, stats,
distributed, prune, eval, train, report/analysis/plan, launch (docs/ARCHITECTURE.md).
"""
