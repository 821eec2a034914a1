"""The typed schema of `params.yaml`: one model per section, unknown keys rejected.

`load_params()` is the only way stages read parameters. Any problem becomes a
`ConfigError` naming the dotted key and what was expected (exit code 2). The sections live
in pipeline order: `base` (compute, corpus, model, pretrain), `experiment` (locate → lds),
`smda`; `params` holds the whole file, its cross-section checks, loading and `RecordedParams`.
"""

from mda.core.config.base import (  # noqa: F401
    Section, Compute, SyntheticCorpus, PythiaCorpus, HfCorpus, Corpus, HubModel, Model, ProbeSettings, Pretrain, PythiaSize)
from mda.core.config.experiment import (  # noqa: F401
    Locate, Influence, Select, Retrain, Evaluate, Lds, ArmName)
from mda.core.config.smda import (  # noqa: F401
    SmdaSection, SmdaHub, SmdaModel, SmdaTaskFiles, SmdaTask, SftRecipe, SmdaInstruct, SmdaSae, SmdaPolicy, SmdaInfluence, SmdaCurate, SmdaSft, SmdaEvaluate, Smda)
from mda.core.config.params import (  # noqa: F401
    Params, parse_params, load_params, RecordedParams, unwrap)
