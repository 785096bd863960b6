"""DeepSpeed trainers: MAE-ST pretraining (pretrain.py) and fine-tuning (finetune.py)."""
