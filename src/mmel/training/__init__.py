"""mmel.training: Lightning training of any MelModel (the only layer, with the shells, that imports Lightning).

- `recipe`: typed recipes from YAML (packaged under `recipes/`), with `--set key=value` overrides;
- `datamodule`: batches of mentions with their gold entities (features from the store, or raw items);
- `system`: `MelSystem`, the LightningModule (unit-consistency loss, full-KB dev ranking);
- `export`: the best weights as a `save_pretrained` directory with a model card;
- `plots`: the training-curve PNG;
- `run`: `train(recipe, data_dir=..., out_dir=..., features_dir=...)`, what `mmel train` calls.
"""
