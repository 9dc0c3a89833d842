from setuptools import setup

setup(
    name="setr-engine",
    version="0.1.0",
    description="SETR (ViT-L/16 + Naive/PUP/MLA heads) trained with our own Triton kernels and FSDP2",
    packages=["kernels", "setr", "setr.data", "train", "bench"],
    python_requires=">=3.10",
    # OpenCV applies the EXIF orientation of PNG files from 4.11 on (opencv PR #26181), as mmcv's reads do
    install_requires=["torch>=2.6", "triton>=3.2", "numpy", "pillow", "opencv-python-headless>=4.11",
                      "safetensors>=0.4", "huggingface_hub>=0.24"],
    extras_require={"test": ["pytest", "scipy"], "bench": ["matplotlib"], "plot": ["matplotlib"], "tb": ["tensorboard"],
                    "all": ["matplotlib", "tensorboard", "pytest", "scipy"]},
    entry_points={"console_scripts": ["setr-train=train.launch:run", "setr-predict=setr.predict:main",
                                      "setr-eval=setr.evaluate:main", "setr-plot=train.plot:main"]},
)
