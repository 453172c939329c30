"""The command encoders: the image encoder registry, with what each encoder expects and how to train with it."""

from __future__ import annotations

import argparse
import json


def _add_encoders(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "encoders",
        parents=[common],
        help="list the image encoders (architectures and pathology foundation models)",
        description="List every image encoder `cmrcnet train --encoder` accepts: its architecture, embedding "
        "size and expected input, and for pathology foundation models where to get the weights, the licence "
        "accepted there and the exact `cmrcnet train` command. Weights are never downloaded by cmrcnet.",
    )
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(handler=_run_encoders)


def encoder_rows() -> list[dict]:
    """One dict per registered encoder (the listing's content)."""
    from cmrcnet.models.encoders import ARCHITECTURES

    rows = []
    for name, arch in ARCHITECTURES.items():
        spec = arch.foundation
        row = {"name": name, "architecture": arch.description, "foundation_model": spec is not None}
        if spec is None:
            row["input"] = "the --config preset's img_size (trained from scratch or from --encoder-weights)"
            row["train"] = f"cmrcnet train --data DATA --train-samples IDS --out RUN --encoder {name}"
        else:
            row.update(
                architecture=spec.architecture,
                embedding=spec.embed_dim,
                input=f"{spec.img_size} px at {spec.um_per_px} um/px ({spec.fov_um:g} um); {spec.input_note}",
                normalisation={"mean": list(spec.mean), "std": list(spec.std)},
                weights=f"{spec.weights_url} ({spec.weights_file})",
                licence=spec.licence,
                train=(
                    f"cmrcnet train --data DATA --train-samples IDS --out RUN --encoder {name} "
                    f"--encoder-weights PATH/TO/{spec.weights_file.split()[0]} --device cuda"
                ),
            )
        rows.append(row)
    return rows


def _run_encoders(args: argparse.Namespace) -> int:
    rows = encoder_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = "foundation model, frozen features" if row["foundation_model"] else "architecture"
        print(f"{row['name']}  ({kind})")
        print(f"  architecture: {row['architecture']}")
        if "embedding" in row:
            print(f"  embedding:    {row['embedding']}")
        print(f"  input:        {row['input']}")
        if "weights" in row:
            print(f"  weights:      {row['weights']}")
            print(f"  licence:      {row['licence']}")
        print(f"  train:        {row['train']}")
        print()
    return 0
