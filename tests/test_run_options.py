"""Launcher decisions: the default runner, and how many workers share the rate budget."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import StandardOptions

from pipeline.config import parse_config
from pipeline.run import beam_options, is_local_runner, resolve_workers

CFG = parse_config({"input": {"path": "x/*.jsonl"}})


def test_default_runner_is_the_offline_fn_api_runner() -> None:
    options = beam_options([])
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    assert is_local_runner(options)
    assert beam_options(["--runner=DataflowRunner"]).view_as(StandardOptions).runner == "DataflowRunner"


@pytest.mark.parametrize(
    ("args", "workers"),
    [
        ([], 1),
        (["--direct_running_mode=multi_threading", "--direct_num_workers=4"], 1),  # one process
        (["--direct_running_mode=multi_processing", "--direct_num_workers=3"], 3),
        (["--runner=DataflowRunner", "--max_num_workers=20", "--num_workers=5"], 20),
        (["--runner=DataflowRunner", "--num_workers=5"], 5),
        # One SDK process per vCPU unless multiple SDK containers are turned off.
        (["--runner=DataflowRunner", "--max_num_workers=8", "--machine_type=n2-standard-4"], 32),
        (["--runner=DataflowRunner", "--max_num_workers=8", "--worker_machine_type=custom-6-16384"],
         48),
        (["--runner=DataflowRunner", "--max_num_workers=8", "--machine_type=n2-standard-4",
          "--experiments=no_use_multiple_sdk_containers"], 8),
        (["--runner=FlinkRunner", "--parallelism=8"], 8),
        (["--runner=PortableRunner"], 1),
    ],
)
def test_workers_are_derived_from_beam_options(args: list[str], workers: int) -> None:
    assert resolve_workers(CFG, beam_options(args)) == workers


def test_configured_workers_win() -> None:
    cfg = parse_config({"input": {"path": "x"}, "limits": {"workers": 6}})
    assert resolve_workers(cfg, beam_options(["--max_num_workers=20",
                                              "--runner=DataflowRunner"])) == 6
