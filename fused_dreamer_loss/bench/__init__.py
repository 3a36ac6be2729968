"""The benchmark (``fused-dreamer-loss-bench``): the fused Dreamer losses against eager torch,
torch.compile and torchrl.

Run ``fused-dreamer-loss-bench --help`` (or ``python -m fused_dreamer_loss.bench --help``).
From Python: :func:`run` returns the report (a dict, the ``--json`` schema), :func:`main` the exit
status (0, or 1 when a fused result was wrong or an implementation crashed).

``--loss v1`` (the default) times the Dreamer loss (:func:`~fused_dreamer_loss.dreamer_model_loss`),
``--loss v3`` the DreamerV3 loss (:func:`~fused_dreamer_loss.dreamer_v3_model_loss`) with the
options of one of :data:`~fused_dreamer_loss.V3_CONVENTIONS`. Every implementation is timed on the
same inputs, and every row reports the achieved bandwidth under one minimal-traffic model (DESIGN
§3, DESIGN-V3 §5: each input read once, each needed gradient written once), so GB/s ratios are
speed ratios. On CUDA the timer is ``triton.testing.do_bench`` (median) over several input sets in
rotation, next to a device-to-device copy measured in the same run.

Without CUDA the fused kernels run through Triton's interpreter: they are checked against the
float64 reference and their launches counted, but not timed (the interpreter's speed says nothing
about the kernels'). Every row counts the kernel launches of one step (see
:func:`.timing.count_launches`). A figure that was not measured is None in the JSON and "—" in the
table, never 0.

The package, one role a module: :mod:`.presets` (sizes, inputs, minimal-traffic models),
:mod:`.peers` (eager, compiled and torchrl implementations; the check of the fused result),
:mod:`.timing` (timer, CUDA graphs, launch counts, the interpreter switch), :mod:`.losses` (what a
run of each loss measures), :mod:`.workloads` (the loss and train-step workloads), :mod:`.report`
(rows, table, plot), :mod:`.registry` (the tables below) and :mod:`.cli` (parser, run, main).

Adding a workload or a loss: one module and one entry in :mod:`.registry`.

* A workload is an entry ``WORKLOADS["name"] = Workload(rows, help="...")``: ``--workload name``
  then calls ``rows(run)`` with a :class:`~.workloads.Run` (``run.args``: the parsed command line,
  completed by :func:`~.cli.parse_args`, its ``preset``, ``dtype``, ``mode`` and ``impl`` lists,
  ``device``, ``cuda_graph``, ...; ``run.case``: the loss of ``--loss``; ``run.copy_gbps``: the
  device's copy bandwidth, None off CUDA) and reports the :class:`~.report.Row` list it returns.
  ``run.each(modes, one, describe)`` makes the usual rows: ``one(impl, preset, dtype_name, mode)``
  for every preset and dtype of the command line (``describe(preset, dtype_name)`` printed before
  each) and every mode of ``modes`` and implementation of ``--impl``, with a progress line; a row
  that raises becomes a ``failed: ...`` row and the run goes on. Start a row with
  ``run.case.row(impl, preset, dtype_name, mode)``; put ``"n/a: why"`` or ``"skipped: why"`` in its
  status where it cannot run, ``"wrong: why"`` where a fused result is wrong (exit status 1), and
  workload-specific figures in ``row.extra``. The speed-up against the eager row of the same preset,
  dtype and mode, the table, the JSON and the plot come for free. To measure: ``run.case.inputs``
  and ``run.case.fn(impl, device)``, :func:`.timing.step_fn`, :func:`.timing.unavailable` (why an
  implementation gives no row here), :func:`.timing.time_into` (median, min, max, noisy flag) and
  :func:`.timing.count_launches_into`.
* A loss is an entry ``LOSSES["name"] = Loss(case, presets, gpu_presets, cpu_presets, help=...,
  preset_help=..., settle=...)``: ``case(args)`` makes the run's :class:`~.losses.Case` (the
  methods the workloads call: ``row``, ``describe``, ``model_bytes``, ``inputs``, ``check``,
  ``fn``, ``not_applicable``, ``train_step``, ``checked``; the attributes ``loss`` and
  ``losses``); ``presets`` are its ``--preset`` names (shared with no other loss);
  ``settle(args)`` completes its own defaults and returns the message of an argument it refuses,
  or None.
* On a CPU, when ``--impl`` includes ``fused``, the command runs with Triton's interpreter on
  (:func:`.timing.checks_fused_on_cpu`): a fused row there is checked, not timed.
"""

from .cli import main, make_parser, parse_args, run  # noqa: F401
from .registry import LOSSES, WORKLOADS, Loss, Workload  # noqa: F401
