"""``python -m finetune`` is the ``finetune`` command (torchrun launches it this way)."""

from finetune.cli import main

main()
