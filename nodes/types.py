"""Custom socket types of the pack, declared once. Their names never change once shared."""

from comfy_api.latest import io

LycorisConfig = io.Custom("LYCORIS_CONFIG")
LycorisAdapter = io.Custom("LYCORIS_ADAPTER")
LycorisJob = io.Custom("LYCORIS_JOB")
LycorisDataset = io.Custom("LYCORIS_DATASET")
LycorisValidation = io.Custom("LYCORIS_VALIDATION")
LycorisSchedule = io.Custom("LYCORIS_SCHEDULE")
LycorisVariants = io.Custom("LYCORIS_VARIANTS")  # named looks for LyCORIS A/B
TRAIN_CATEGORY = "LyCORIS/train"

CATEGORY = "LyCORIS"
DEV_CATEGORY = "LyCORIS/dev"
