"""Face-ID backbones as torch modules, and readers for the formats they ship in."""
