"""Fused ops. One folder per op: ``api.py`` (public function, validation, ``impl=``), ``reference.py``
(eager CPU oracle), then one file per optimised backend; backends never import each other."""
