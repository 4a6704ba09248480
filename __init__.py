"""dli: Dynamic Label Injection for imbalanced industrial defect segmentation.

The repository root is this package. Data flows one way:
manifest (`dli.data.manifest`) -> plan (`dli.pipeline.planner`) -> DALI decode and augment
(`dli.pipeline`) -> injection (`dli.kernels`) -> UNet (`dli.models`, `dli.train`).
"""

__version__ = "0.1.0"
