"""The summary of one prepared run of the benches on an accelerator (bench/gpu.sh): each headline
figure beside its bound where one applies, in one table and one JSON.

- Decode at batch 1 reads every weight once per token, so the memory bandwidth over the weights'
  bytes is its ceiling in tokens/s (`bench.chat_precision`, float and NF4). The bandwidth is
  measured here, in the same run: a device-to-device copy of a large buffer, bytes read and written.
- The chat engine at 8 clients against 1: the ratio of a decode step's time at 1 and 8 rows
  (`bench.chat`'s own measurement) bounds what batching can gain.
- ILF's speedup against DDIM-20: the ratio of transformer blocks each runs (`bench.ilf_real_scale`).
- Image batching (`bench.images`): images/s batched against sequential, no physical bound given.

    python -m bench.gpu_report --out DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def copy_bandwidth(device: str, megabytes: int, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return 2 * source.numel() / statistics.median(seconds[2:])  # the first two warm the allocator and caches


def read(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary(out: Path, device: str, bandwidth: float) -> dict:
    rows = []
    precision = read(out / "chat_precision" / f"{device}.json")
    for name, row in (precision or {}).get("rows", {}).items():
        weight_bytes = row["weight_megabytes"] * 2**20
        bound = bandwidth / weight_bytes
        rows.append({"figure": f"decode at batch 1, {'float' if name == 'none' else name} weights "
                               f"({row['weight_megabytes']:.1f} MiB), tokens/s", "value": row["decode_tokens_per_s"],
                     "unit": "tokens/s", "bound": bound, "of_bound": row["decode_tokens_per_s"] / bound,
                     "weight_bytes": weight_bytes})
    chat = read(out / "chat" / f"{device}.json")
    for r in (chat or {}).get("rows", []):
        if r["clients"] == 8 and not r["setting"].startswith("transformers"):
            ceiling = chat["batching"]["ceiling_8_clients"]
            rows.append({"figure": f"chat engine, {r['setting'].removeprefix('engine, ')}: 8 clients against 1",
                         "value": r["vs_one_client"], "unit": "x", "bound": ceiling,
                         "of_bound": r["vs_one_client"] / ceiling})
        if r["clients"] == 1 and r["setting"] == "engine, base":
            rows.append({"figure": "chat engine, base, 1 client, against transformers' generate",
                         "value": r["vs_baseline"], "unit": "x", "bound": None, "of_bound": None})
    for r in (read(out / "ilf_real_scale.json") or {}).get("rows", []):
        rows.append({"figure": f"ILF-{r['ilf_steps']} against DDIM-20, {r['shape']} {r['dtype']} batch {r['batch']}",
                     "value": r["speedup"], "unit": "x", "bound": r["ideal_speedup"],
                     "of_bound": r["speedup"] / r["ideal_speedup"]})
    images = read(out / "images" / "images.json")
    by = {(r["mode"], r["clients"], r["serving"]): r for r in (images or {}).get("rows", [])}
    for (mode, clients, serving), r in by.items():
        if serving == "batched":
            sequential = by[mode, clients, "sequential"]["images_per_s"]
            rows.append({"figure": f"images {mode}, {clients} clients: batched against sequential",
                         "value": r["images_per_s"] / sequential, "unit": "x", "bound": None, "of_bound": None})
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"device": device, "card": name, "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows,
            "parts": {"chat_precision": precision is not None, "chat": chat is not None,
                      "ilf_real_scale": bool(read(out / "ilf_real_scale.json")), "images": images is not None}}


def table(report: dict) -> str:
    lines = [f"{report['card']} ({report['device']}): copy bandwidth "
             f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read and written)",
             f"{'figure':<72}{'value':>10}{'bound':>10}{'of bound':>10}"]
    for r in report["rows"]:
        bound = f"{r['bound']:>10.2f}" if r["bound"] is not None else f"{'-':>10}"
        share = f"{r['of_bound']:>10.1%}" if r["of_bound"] is not None else f"{'-':>10}"
        lines.append(f"{r['figure'][:71]:<72}{r['value']:>9.2f}{'x' if r['unit'] == 'x' else ' '}{bound}{share}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder the benches wrote their JSON into")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--megabytes", type=int, default=None, help="copy size (default: 1024 on CUDA, 64 else)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(args.device, args.megabytes or (1024 if args.device == "cuda" else 64))
    report = summary(args.out, args.device, bandwidth)
    print(table(report))
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'gpu.json'}")


if __name__ == "__main__":
    main()
