"""In-process fits (what `bidirlm run` does stage after stage) release their model when the CLI is dropped."""

import gc
import weakref
from pathlib import Path

from bidirlm_pl.cli.fit import run_lightning

CONFIG = Path(__file__).parents[1] / "configs/mntp/tiny.yaml"


def test_a_finished_in_process_fit_leaves_no_reference_to_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning([
        "fit", "--config", str(CONFIG),
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.callbacks=null",
        "--trainer.enable_checkpointing=false", "--trainer.logger=false",
    ])
    model = weakref.ref(cli.model)
    del cli
    gc.collect()
    assert model() is None
