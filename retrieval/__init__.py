"""Use the fine-tuned CLIP: caption images from a caption bank, search images with text, in bulk."""
