"""schane.losses: pure tensor contrastive losses."""
