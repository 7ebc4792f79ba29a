"""Stage 1: official CIFAR-10 / Flickr8k files → WebDataset shards + manifest.json."""
