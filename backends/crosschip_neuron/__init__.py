"""The ``neuron`` backend: AWS neuronx-distributed parallel layers on Trainium/Inferentia."""
