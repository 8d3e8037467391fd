#!/usr/bin/env bash
# The README's pictures of `finetune eval --report` and `finetune inspect`, made by finetune
# itself from the quickstart's digits-finetune run (run the quickstart first), from the repo root:
#
#   bash docs/images/make.sh
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The run's validation images (digits 5-9 of the fixed 80/20 split) as an image folder.
python - "$work/val" <<'PY'
import sys
from pathlib import Path

from finetune.config.sources import DigitsSource
from finetune.sources import DigitsDataset

images = DigitsDataset(DigitsSource(type="digits", split="val", classes=[5, 6, 7, 8, 9]))
for index, (image, label) in enumerate(images):
    folder = Path(sys.argv[1]) / images.classes[label]
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{index:03d}.png")
PY
run=checkpoints/digits-finetune/latest
finetune eval "$run" "$work/val" --report "$work/report"
finetune inspect "$run" --image "$(ls -d "$work"/val/6/* | head -1)" --out "$work/inspect"
for name in confusion worst calibration; do cp "$work/report/$name.png" "docs/images/eval-$name.png"; done
cp "$work/inspect/change.png" docs/images/inspect-change.png
cp "$work"/inspect/1-*-gradcam.png docs/images/inspect-gradcam.png
ls -l docs/images/*.png
