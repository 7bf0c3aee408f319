"""Eager lowering: run the model as it is (the reference every other lowering is compared with)."""


def graph(gm, example_inputs):
    return gm


def module(model, example_inputs):
    return model
