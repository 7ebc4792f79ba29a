import os

if "DS_ACCELERATOR" not in os.environ:  # diffusers imports DeepSpeed, which guesses its device aloud
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
