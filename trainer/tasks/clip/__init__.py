"""The CLIP tasks: fine-tune a CLIPFineTuner (core.clip) by classification through class prompts
(CIFAR-10) or by contrastive image–caption matching over the global batch (Flickr8k).

Each builds the model from `model.name` (a hub id or folder) or a preset built into the run folder,
preprocesses as CLIP does (core.preprocess), evaluates (top-1/top-5 through the prompts; Recall@k both
ways) and exports HF folders that `transformers.CLIPModel.from_pretrained` and
`CLIPFineTuner.from_pretrained` load.

The room: config (ModelConfig, a leaf), model (build, freeze, where from), objective (losses and
metrics, pure), tasks (the two tasks). The package imports nothing, so that its config stays a leaf.
"""
