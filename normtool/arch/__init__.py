"""Architecture adapters: recognise a checkpoint's family and describe it as a Graph."""
