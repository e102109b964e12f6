"""The bicubic super-resolution baseline (x2, x3, x4) on Set5, Set14 and BSD100 next to the published figures.

The protocol of SRCNN's MATLAB code: Y channel of rgb2ycbcr (uint8), crop to a multiple of the
scale, MATLAB bicubic down and up (convforge.data.resize.imresize), uint8 rounding, PSNR and SSIM
with `scale` pixels shaved from each border. Needs ../shared/datasets/sr-benchmarks.tar.gz (or --root).

    python benchmarks/superres_bicubic.py [--root DIR] [--threads 2] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import extracted, record

from convforge.data.superres import load_sr_folder
from convforge.measure.superres import evaluate_superres

# Bicubic PSNR / SSIM as printed in VDSR (Kim et al., CVPR 2016, Table 3) and LapSRN (CVPR 2017), whose Set5
# and x3 Set14 PSNRs are SRCNN's (TPAMI 2016); SRCNN prints Set14 x2 30.23 and x3 27.54 (0.7736).
PUBLISHED = {
    "Set5": {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
    "Set14": {2: (30.24, 0.8688), 3: (27.55, 0.7742), 4: (26.00, 0.7027)},
    "BSD100": {2: (29.56, 0.8431), 3: (27.21, 0.7385), 4: (25.96, 0.6675)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="folder holding Set5/, Set14/, BSD100/ (default: extract the shared archive)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root) if args.root else extracted("sr-benchmarks.tar.gz", "sr")
    lines = ["| set | scale | images | PSNR (dB) | published | diff. | SSIM | published | diff. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    start = time.perf_counter()
    for name, by_scale in PUBLISHED.items():
        for scale, (paper_psnr, paper_ssim) in by_scale.items():
            result = evaluate_superres(None, load_sr_folder(root / name, scale), scale, upsampled_input=True)
            p, s = result["bicubic_psnr"], result["bicubic_ssim"]
            dp, ds = round(p - paper_psnr, 2) + 0.0, round(s - paper_ssim, 4) + 0.0  # + 0.0: no "-0.00"
            lines.append(f"| {name} | x{scale} | {result['images']} | **{p:.2f}** | {paper_psnr:.2f} | {dp:+.2f} "
                         f"| **{s:.4f}** | {paper_ssim:.4f} | {ds:+.4f} |")
            print(lines[-1], flush=True)
    lines += ["", "Published: VDSR (Kim et al. 2016) Table 3, as LapSRN reprints it; SRCNN (TPAMI 2016) prints Set14 "
              "30.23 / 27.54 / 26.00 dB for x2 / x3 / x4.", f"Whole run: {time.perf_counter() - start:.0f} s.",
              f"Command: `python benchmarks/superres_bicubic.py{''.join(' ' + a for a in sys.argv[1:])}`"]
    record("Bicubic super-resolution baseline (Y channel, MATLAB imresize, shave = scale)", lines, save=not args.no_record)


if __name__ == "__main__":
    main()
