"""``bidirlm assets NAME``: build or reuse an offline asset and print its folder."""

from __future__ import annotations

from bidirlm_pl.core import assets


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=sorted(assets.ASSETS) + ["lee", "list"],
                        help="asset to prepare ('list' shows them, 'lee' prints the corpus files)")


def main(args) -> int:
    if args.name == "list":
        for name in sorted(assets.ASSETS):
            print(name)
        print("lee")
        return 0
    if args.name == "lee":
        for name in ("lee_background.cor", "lee.cor", "similarities0-1.txt"):
            print(assets.gensim_data(name))
        return 0
    print(assets.ASSETS[args.name]())
    return 0
