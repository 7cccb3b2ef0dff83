"""The Zip method's stages (see docs/method.md). Model code; imported lazily by the generator."""
