"""kdkit push: upload a run's student folder, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  kdkit push runs/deit-ti --repo alice/deit-tiny-cifar10
  kdkit push runs/deit-ti/student --repo my-org/deit-tiny-cifar10 --private --token "$HF_TOKEN"

Uploads RUN/student as it is (model.safetensors, config.json, kdkit_head.safetensors if any) with
README.md, its model card, written first (a README.md without kdkit's marker line is yours and
kept). Load it back with timm.create_model("hf-hub:USER/NAME", pretrained=True). Without a
network (or with HF_HUB_OFFLINE=1) it stops within seconds and says where the folder is; for the
fused head in plain timm, push a `kdkit export RUN --format safetensors` folder's files instead.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a run's student (and its model card) to the Hugging Face Hub",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a run directory, or a student folder")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the one `hf auth login` saved)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.cli.report import out
    from kdkit.hub import push

    url = push(args.run, args.repo, args.private, args.token)
    out.print(f"pushed to {url}", soft_wrap=True)
    return 0
