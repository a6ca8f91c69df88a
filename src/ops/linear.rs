use candle_core::{DType, Result, Tensor};

/// `y = x Wᵀ (+ b)`, the weight stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Bytes a forward reads from the weight (and bias).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.weight) + self.bias.as_ref().map_or(0, bytes)
    }

    /// # Shapes
    /// `x: [n, in] -> [n, out]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        let y = x.matmul(&w.t()?)?;
        match &self.bias {
            Some(b) if b.dtype() == DType::F32 || b.dtype() == y.dtype() => {
                y.broadcast_add(&b.to_dtype(y.dtype())?)
            }
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}
