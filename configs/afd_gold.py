"""AfD on the built-in gold-reward task: SFT on demonstrations, reward models, Best-of-N.

  python -m dil_jax.afd.main --config=configs/afd_gold.py --workdir=/tmp/afd_gold
  python experiments/afd_claims.py --out=experiments/results   # claims C2–C7, 3 seeds

π_0 is the quickstart's base policy (SFT on the task's noisy base distribution). The
``afd`` section (defaults documented in ``dil_jax.afd.extrapolation.default_config``) then
runs reward-model extrapolation: π_SFT = SFT of π_0 on expert demonstrations, Init-SFT /
Init-Demo / SFT-Demo
classifiers, a Bradley–Terry RM on base preference pairs, the exact log-ratio reward, and
Best-of-N from π_SFT with N ∈ {1, 5, 10, 30, 50}. The top-level fields describe π_0's run and
the policy architecture, as in every config derived from base.py.
"""

from dil_jax import config_files
from dil_jax.afd import extrapolation as afd

quickstart = config_files.sibling(__file__, "quickstart")


def get_config():
    config = quickstart.get_config()
    config.loss.name = "sft"  # the top-level loss is unused by the AfD pipeline's stages
    config.data.format = "sft"
    config.data.response_source = "expert"
    config.eval.gold_prompts = 0
    config.afd = afd.default_config()
    return config
