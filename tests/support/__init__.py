"""Helpers the tests share: waiting for a state, reading metrics, raw HTTP. Test modules
import from here, never from each other."""
