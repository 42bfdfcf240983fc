"""Open a run in TensorBoard with headless Chromium and save a screenshot of one of its pages.

Checks what a user sees, not only what the event files hold:

    python3 scripts/screenshot_tensorboard.py --logdir ./logs --out tensorboard.png              # first page
    python3 scripts/screenshot_tensorboard.py --logdir ./logs --page text --out samples.png       # the samples

Needs Chromium (`apt-get install chromium` on Debian/Ubuntu) and TensorBoard (in requirements.txt).
`--page` is TensorBoard's page name: `custom_scalars` (the run's story, the default), `scalars`, `text`,
`timeseries`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

logger = logging.getLogger("screenshot_tensorboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="./logs", help="TensorBoard's --logdir (runs are its subfolders)")
    parser.add_argument("--page", default="custom_scalars")
    parser.add_argument("--out", type=Path, default=Path("tensorboard.png"))
    parser.add_argument("--size", default="1400,2000", help="window width,height in pixels")
    parser.add_argument("--wait_ms", type=int, default=20000, help="page time given to load and draw the charts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        logger.error("error: no Chromium found; install it (apt-get install chromium).")
        return 2
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", 120)
        time.sleep(2)  # the first scan of the log folder
        command = [
            browser,
            "--headless",
            "--no-sandbox",  # running as root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={args.size}",
            f"--virtual-time-budget={args.wait_ms}",
            f"--screenshot={args.out.resolve()}",
            f"http://127.0.0.1:{port}/#{args.page}",
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    finally:
        board.terminate()
        board.wait(timeout=30)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
