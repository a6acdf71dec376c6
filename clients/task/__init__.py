"""The ML task library shared by every process that runs the model.

Sites train with it, the server evaluates and saves with it, edge nodes serve with it:
data formats and validation (`data`), the base model and LoRA adapters (`model`), the
local training and evaluation loops (`train`), the round plan the server sends to sites
(`plan`) and the exception tree (`errors`). It imports no Flower and no MLflow.

Usage::

    examples = load_examples(path, task="sequence-classification", labels=labels)
    model = build_model(spec)
    result = train_local(model, examples, plan=plan, rng=torch.Generator().manual_seed(0))
"""
