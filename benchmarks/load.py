"""Time and peak host memory to load real checkpoints: easytunix vs transformers.

Each loader runs in a fresh subprocess so peak RSS belongs to it alone; both end
with every weight resident (transformers maps lazily, so its weights are touched). We report
the RSS after imports, the peak during the load, and the load time (float32,
the converted GGUF folders from ``easytunix.convert.real_models``).

    python benchmarks/load.py [--models smollm2-135m-instruct gemma3-270m] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

SNIPPETS = {
    "easytunix": """
        import jax
        from easytunix.models import load_model
        jax.numpy.zeros(1).block_until_ready()
        base = rss()
        t0 = time.perf_counter()
        model = load_model(FOLDER, dtype=DTYPE)
        jax.block_until_ready(jax.tree.leaves(__import__('flax').nnx.state(model)))
        elapsed = time.perf_counter() - t0
    """,
    "transformers": """
        import torch, transformers
        base = rss()
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=getattr(torch, DTYPE))
        # transformers maps the file lazily; touch every weight so both sides end fully resident.
        with torch.no_grad():
            sum(float(p.sum()) for p in model.parameters())
        elapsed = time.perf_counter() - t0
    """,
}

PRELUDE = """
import json, resource, time
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS'):
                return int(line.split()[1]) / 1024
"""

EPILOGUE = """
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(seconds=elapsed, base_mb=base, peak_mb=peak)))
"""


def measure(library: str, folder: str, dtype: str) -> dict:
  code = PRELUDE + f"FOLDER={folder!r}\nDTYPE={dtype!r}\n" + textwrap.dedent(SNIPPETS[library]) + EPILOGUE
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  from easytunix.convert.real_models import ensure_real_model

  rows = []
  for name in args.models:
    folder = str(ensure_real_model(name))
    results = {}
    for library in SNIPPETS:
      runs = [measure(library, folder, args.dtype) for _ in range(args.repeats)]
      best = min(runs, key=lambda r: r["seconds"])
      results[library] = best
    rows.append((name, results))

  print(f"\nLoad {args.dtype} weights (best of {args.repeats}; peak RSS includes imports)\n")
  header = f"| model | library | load s | RSS after import MB | peak RSS MB | peak - import MB |"
  print(header)
  print("|" + "---|" * 6)
  for name, results in rows:
    for library, r in results.items():
      print(f"| {name} | {library} | {r['seconds']:.2f} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |")
    e, t = results["easytunix"], results["transformers"]
    print(f"| {name} | ratio easytunix/transformers | {e['seconds'] / t['seconds']:.2f}x | | "
          f"{e['peak_mb'] / t['peak_mb']:.2f}x | {(e['peak_mb'] - e['base_mb']) / max(t['peak_mb'] - t['base_mb'], 1):.2f}x |")


if __name__ == "__main__":
  main()
