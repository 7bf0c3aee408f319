"""Eager lowering: run the graph as it is (the reference every other lowering is measured against)."""


def graph(gm, example_inputs):
    return gm


def module(model):
    return model
