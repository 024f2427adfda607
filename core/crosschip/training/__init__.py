"""Training: ``crosschip train`` (``train``, ``train_args``), its data (``data``, ``corpus``,
``tokenizer``), schedule, clipping and metrics, and saving and resuming its state
(``training_state``, ``resume``, ``periodic_saves``)."""
