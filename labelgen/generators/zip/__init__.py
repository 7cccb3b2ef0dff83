"""The Zip generator and its four stages (see docs/method.md)."""
