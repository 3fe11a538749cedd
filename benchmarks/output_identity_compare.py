"""Compare a folder of outputs from `benchmarks/output_identity.py` (kept, e.g. run with a patched
temporary folder, or a subset run) with the committed baseline `output_identity.sha256`, for runs
made from another source path: the source path in JSON files is rewritten to the baseline's
(/tmp/arch-base/) before hashing; manifests are skipped (they hold checksums of config.json, whose
timings differ on every run).

    python benchmarks/output_identity_compare.py OUTPUT_FOLDER SOURCE_PREFIX
    e.g. python benchmarks/output_identity_compare.py /tmp/arch-final-out /tmp/arch-final/
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from output_identity import digest, stable_json  # noqa: E402

BASELINE = Path(__file__).resolve().parent / "output_identity.sha256"
BASELINE_SOURCE = "/tmp/arch-base/"  # where the baseline's source tree was


def main() -> None:
    root, here = Path(sys.argv[1]), sys.argv[2]
    base = dict(reversed(line.split("  ", 1)) for line in BASELINE.read_text().splitlines())
    same = differ = 0
    for path in sorted(root.rglob("*")):
        if (path.suffix not in {".png", ".json", ".csv"} or path.name == ".spdinv-manifest.json"
                or "demo-work" in path.parts or "world" in path.parts[len(root.parts):][:1]):
            continue
        name = str(path.relative_to(root))
        if path.suffix == ".json":
            value = json.loads(path.read_text().replace(here, BASELINE_SOURCE))
            found = hashlib.sha256(json.dumps(stable_json(value), sort_keys=True).encode()).hexdigest()
        else:
            found = digest(path)
        if name not in base:
            print(f"not in the baseline: {name}")
        elif found == base[name]:
            same += 1
        else:
            differ += 1
            print(f"differs: {name}")
    print(f"{same} identical, {differ} differ (manifests skipped)")


if __name__ == "__main__":
    main()
