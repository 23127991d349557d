"""The ``diffaccel`` command line.

Example:
    $ diffaccel generate "a red circle to the left of a blue square" --steps 50 \\
        --encoder-reuse faster-diffusion --out image.png

``diffaccel generate`` (:mod:`~diffaccel.cli.image`) makes an image, ``diffaccel generate-video``
(:mod:`~diffaccel.cli.video`) a clip, ``diffaccel eval`` (:mod:`~diffaccel.cli.evaluate`) compares
variants side by side; the options they share are declared once in
:mod:`~diffaccel.cli.options`, the steering ones in :mod:`~diffaccel.cli.steering`, the models they
know by name in :mod:`~diffaccel.cli.models`. ``--model diffaccel/tiny-random-sd`` is a tiny
random-weight pipeline built in code (it draws noise: it shows the machinery, not a picture);
``--model org/name`` goes to the hub.

Every input is checked before the model loads (:mod:`~diffaccel.cli.checks`): a bad one is a
one-line error, an option that does nothing is a warning. Parsing the arguments imports neither
torch nor diffusers.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from . import evaluate, image, video
from .checks import fail


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffaccel`` command (building it imports no torch).

    Example:
        >>> build_parser().parse_args(["generate", "a red circle", "--out", "x.png"]).steps
        50
    """
    parser = argparse.ArgumentParser(prog="diffaccel", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    image.add_parser(commands)
    video.add_parser(commands)
    evaluate.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffaccel`` console script; errors diffaccel raises on purpose end it
    with their one-line message."""
    args = build_parser().parse_args(argv)
    from ..errors import DiffaccelError

    try:
        if args.command == "generate":
            image.generate(args)
        elif args.command == "generate-video":
            video.generate_video(args)
        elif args.command == "eval":
            evaluate.run_eval(args)
    except DiffaccelError as err:
        fail(str(err))
    return 0
