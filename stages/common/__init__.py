"""What both stage-two tasks (and stage one's runtime) share: the trainer, device and
precision choice, progress bars, input geometry, the joined store+dataset, and splits."""
