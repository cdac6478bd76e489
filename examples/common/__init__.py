"""Shared machinery of the EC2T examples (data, mesh, checkpoints, logging, training loop).

Kept next to the scripts (not in the library) because it is example code: read
it, copy it, change it. The scripts import it as ``common`` (the script's folder
is on ``sys.path`` when you run ``python examples/mnist_lenet.py``).
"""
