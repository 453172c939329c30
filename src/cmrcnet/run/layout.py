"""File names inside a RUN_DIR, defined once for the trainer, the bank and prediction."""

CONFIG_FILE = "config.yaml"  # resolved RunConfig
MODEL_FILE = "model.json"  # ModelConfig (also stored in every checkpoint)
GENES_FILE = "genes.json"  # the ordered gene list and how it was chosen
NORMALIZATION_FILE = "normalization.json"  # how expression was normalised
SPOTS_FILE = "spots.json"  # training and validation spot ids per sample
METRICS_FILE = "metrics.csv"  # one row per epoch
CURVE_FILE = "loss_curve.png"  # train/validation loss per epoch
RUN_FILE = "run.json"  # provenance and status
BEST_CKPT = "best.pt"  # lowest validation loss
LAST_CKPT = "last.pt"  # end of the latest finished epoch (resume point)
CHECKPOINTS = (BEST_CKPT, LAST_CKPT)  # the checkpoints a run can predict with
BANK_FILE = "bank.pt"  # reference bank for retrieval
CONFIDENCE_REFERENCE_FILE = "confidence_reference.json"  # retrieval similarity of the validation spots
