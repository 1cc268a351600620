"""The stages of the main job, ``vitfab run``, and ``PIPELINE``: the list that runs them.

1. data        the user's folder or the synthetic X-ray set; one seeded split for every stage
               (imbalanced classes: class-balanced training); the run's metric (--metric,
               by default macro-F1 where imbalanced, else top-1) selects everywhere
2. references  the models a user would otherwise train (default ResNet-18 and DeiT-Tiny), each
               with the reference recipe and at least 15 % of the budget; the best on validation
               sets the requirement and teaches the ViTs
3. pilot       which distillation (none, soft, hard) the ViTs learn with: a short pilot on a slice
               of the budget, unless ``--distill`` says
4. baseline    DeiT-B/16: the paper's reference and the speedup denominator (small scale: trained
               from scratch for what its share buys; full scale: fine-tuned from hub or local weights)
5. supernet    an AutoFormer supernet trained on the same split, learning from the teacher
6. search      evolutionary search under params/GMACs limits (``--min-reduction`` x below DeiT-B)
7. finetune    the top-k subnets extracted and fine-tuned, learning from the teacher
8. joint       every fine-tuned subnet x ToMe schedule x precision mode: validation metric and
               operating point off the shelf, speed measured on the device; Pareto front; the
               choice (``optimize.joint``): the fastest meeting the accuracy and the ceilings
9. final       the chosen configuration fine-tuned with its ToMe schedule on; kept only if
               validation says so; saved as ``chosen/`` and evaluated once on the test split
10. export     the chosen model as deploy/: safetensors, TorchScript, ONNX (ToMe inside), parity checked
11. ablation   baseline, each axis, each pair, all three, and the references: test metrics and speed,
               one interleaved run
12. quality    operating points (temperature, reject threshold) of the chosen model, the baseline and
               the best reference; test escape / overkill with 95 % upper bounds, the curves,
               calibration, and a bootstrap interval of the difference to the best reference
13. report     report.md, report.html, PNG plots, summary.json

Each stage is a function ``(ctx, **the results it requires) -> its result``; adding one is a new
function and one line in ``PIPELINE``. Under ``torchrun`` the training stages (``train``) run
data-parallel on every rank, the search and the joint search (``shard``) share their validation
passes out over the ranks, and the rest run on rank 0 alone (``context``).
"""

from __future__ import annotations

from .context import Stage
from .measuring_stages import stage_ablation, stage_export, stage_joint, stage_report, stage_search
from .quality import stage_quality
from .results import (AblationResult, BaselineResult, DataResult, ExportResult, FinalResult, FinetuneResult,
                      JointResult, PilotResult, QualityResult, ReferencesResult, ReportResult, SearchStageResult,
                      SupernetResult)
from .training_stages import (stage_baseline, stage_data, stage_final, stage_finetune, stage_pilot, stage_references,
                              stage_supernet)

PIPELINE: tuple[Stage, ...] = (
    Stage("data", 0.05, stage_data, (), DataResult),
    Stage("references", 3.0, stage_references, ("data",), ReferencesResult, "train"),
    Stage("pilot", 0.5, stage_pilot, ("data", "references"), PilotResult, "train"),
    Stage("baseline", 0.5, stage_baseline, ("data",), BaselineResult, "train"),
    Stage("supernet", 2.0, stage_supernet, ("data", "references", "pilot"), SupernetResult, "train"),
    Stage("search", 0.4, stage_search, ("data", "baseline", "supernet"), SearchStageResult, "shard"),
    Stage("finetune", 1.4, stage_finetune, ("data", "supernet", "search", "references", "pilot"), FinetuneResult,
          "train"),
    Stage("joint", 0.4, stage_joint, ("data", "baseline", "references", "finetune"), JointResult, "shard"),
    Stage("final", 0.7, stage_final, ("data", "finetune", "joint", "references", "pilot"), FinalResult, "train"),
    Stage("export", 0.15, stage_export, ("final",), ExportResult),
    Stage("ablation", 0.8, stage_ablation, ("data", "baseline", "references", "joint", "final"), AblationResult),
    Stage("quality", 0.1, stage_quality, ("data", "baseline", "references", "final"), QualityResult),
    Stage("report", 0.15, stage_report,
          ("data", "references", "pilot", "joint", "final", "export", "ablation", "quality"), ReportResult),
)
