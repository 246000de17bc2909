"""LightningCLI: GradProbe configured from YAML (see ``cli_config.yaml``).

python examples/cli.py fit --config examples/cli_config.yaml
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).parent))
from digits_cnn import DigitsCNN, digits_loaders


class DigitsCNNWithData(DigitsCNN):
    def train_dataloader(self):
        return digits_loaders()[0]

    def val_dataloader(self):
        return digits_loaders()[1]


def main(args: list[str] | None = None) -> LightningCLI:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    cli = LightningCLI(DigitsCNNWithData, args=args, save_config_kwargs={"overwrite": True})
    log_dir = cli.trainer.logger.log_dir if cli.trainer.logger is not None else None
    if log_dir:
        print(f"\nLogs: {log_dir}\nOpen the panels:  tensorboard --logdir {log_dir}")
    return cli


if __name__ == "__main__":
    main()
