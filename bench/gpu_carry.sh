#!/usr/bin/env bash
# Prepare what the lent GPU machine cannot fetch (it has no network): run HERE, before the device call.
#
#   bash bench/gpu_carry.sh            # writes .whl/ (wheels) and .gpu-data/ (24 coco128 images), both git-ignored
#
# Its image has Python 3.12 with torch, torchvision, timm, numpy, scipy, opencv, pyyaml and pytest, but not
# open_clip, segment_anything, pycocotools or ftfy: their wheels for Python 3.12 go to .whl/. Then call the
# device tool with carry [".whl", ".gpu-data"] and the command `bash bench/bench_gpu.sh`, which installs the
# wheels into /tmp/site (no index) and reads the images from .gpu-data/ (about 5 MiB carried in all).
set -euo pipefail
cd "$(dirname "$0")/.."
for entry in /.whl/ /.gpu-data/; do
  grep -qxF "$entry" .git/info/exclude 2>/dev/null || echo "$entry" >> .git/info/exclude
done
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  open_clip_torch==3.3.0 segment-anything==1.0 pycocotools==2.0.11 ftfy==6.3.1 wcwidth==0.2.13
COCO="${LABELGEN_COCO128:-../shared/assets/data/coco128-seg}"
rm -rf .gpu-data && mkdir -p .gpu-data/coco128-seg/images/train2017
ls "$COCO/images/train2017"/*.jpg | head -24 | xargs -I{} cp {} .gpu-data/coco128-seg/images/train2017/
du -sh .whl .gpu-data
