"""The run folder: its file names (`layout`), its configuration (`config.RunConfig`), checkpoints read and
written safely (`checkpoint`), and a trained run loaded for prediction (`load`).

Training writes run folders and inference reads them; both import this part, and neither imports the other for it.
"""
