"""Model builders, one module per family: each turns an HF config into a meganeura Graph."""
