from setuptools import find_packages, setup

setup(
    name="fxcompress",
    version="0.1.0",
    description="torch.fx compiler that makes trained networks shallower: linearise activations, merge linear operators",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fxcompress", "fxcompress.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.9"],
    extras_require={
        "vision": ["torchvision"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "tensorrt": ["torch-tensorrt"],
        "criteria": ["pot", "tqdm"],
        "tokens": ["timm", "transformers"],
        "diffusion": ["diffusers==0.42.1"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "torch_dynamo_backends": ["depthprune = fxcompress.dynamo_backend:depthprune"],
        "console_scripts": ["fxcompress = fxcompress.cli:main"],
    },
)
