"""Stage 1: the data people have (CIFAR-10, Flickr8k, COCO, a CSV, an imagefolder, WebDataset shards) → WebDataset shards + manifest.json."""
