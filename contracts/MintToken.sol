// SPDX-License-Identifier: MIT
pragma solidity ^0.8.27;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @dev The part of USDC that settlement calls: the bytes-signature overload of Circle's FiatToken
/// v2.2, which checks ECDSA signatures for EOAs and ERC-1271 for contract wallets. MockUSDC has it
/// too. Older FiatToken versions (v2.1 and before) have only the (v, r, s) overload.
interface IUSDC {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @notice The token mintq sells. Each paid-for mint carries the off-chain payment id, and the
/// contract remembers every id it has minted for, so a batch that is re-sent after a crash or a
/// replaced transaction can never mint twice for the same payment. A payment settled here by an
/// EIP-3009 authorization has exactly one valid id, {authorizationPaymentId}, so the dedupe
/// follows the money rather than whatever id the minter supplies.
///
/// The contract also holds the sale's cap, {maxMints}, so that neither a bug in the off-chain
/// bookkeeping nor a second deployment sharing this token can oversell, and it pays refunds
/// that the refund wallet can be made to pay at most once per payment ({batchRefund}).
contract MintToken is ERC20, AccessControl, ReentrancyGuard {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @notice The most gas one settlement or refund may use. It bounds what a single item (say, a
    /// payer whose ERC-1271 wallet burns gas) can cost the batch. An EOA's settlement uses about
    /// 40k; the rest is room for contract wallets, including ones that check passkeys (P-256) in
    /// software.
    uint256 public constant SETTLEMENT_GAS = 500_000;

    uint256 public immutable mintAmount;

    /// @dev The most mints whose tokens fit in a uint256 total supply. The cap in force is never
    /// above it, so an absurd quantity is sold out like any other that does not fit, instead of
    /// overflowing and reverting the whole batch.
    uint256 private immutable _supplyMints;

    /// @dev Domain of {refundNonce}, so a refund's nonce cannot equal one the refund wallet
    /// derives for anything else.
    bytes32 private constant _REFUND_NONCE_DOMAIN = keccak256("mintq.refund");

    /// @notice One item of {batchSettleAndMint}: a mint and the EIP-3009 authorization paying for it.
    struct MintItem {
        address recipient;
        // With an authorization to settle, this must be {authorizationPaymentId} of it, or the
        // item is skipped.
        bytes32 paymentId;
        // Mints bought: the item mints quantity * mintAmount and counts quantity towards the cap.
        uint256 quantity;
        // The authorization to settle (payer -> payTo); from == address(0) means "already paid":
        // mint without settling.
        address from;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        // 65 bytes r || s || v (v = 27 or 28) for EOAs, or whatever the wallet's ERC-1271 expects.
        bytes signature;
    }

    /// @notice One item of {batchRefund}: the refund wallet's EIP-3009 authorization to pay `to`
    /// back for `paymentId`, signed with validAfter 0 and nonce {refundNonce}(paymentId).
    struct Refund {
        bytes32 paymentId;
        address from;
        address to;
        uint256 value;
        uint256 validBefore;
        bytes signature;
    }

    /// @notice Payment ids that have already been minted for.
    mapping(bytes32 paymentId => bool) public minted;

    /// @notice The most mints this token may ever make, in units of one mint (`mintAmount`);
    /// type(uint256).max means no cap.
    uint256 public maxMints = type(uint256).max;

    /// @notice Mints made so far, in units of one mint.
    uint256 public totalMints;

    /// @dev `amount` is quantity * mintAmount.
    event Minted(bytes32 indexed paymentId, address indexed recipient, uint256 amount);
    /// @dev Emitted instead of reverting, so one duplicate or bad item cannot sink a whole batch.
    event MintSkipped(bytes32 indexed paymentId, address indexed recipient);
    /// @dev The item did not fit under {maxMints}: it was neither settled nor minted, so its payer
    /// was not charged and its id stays unminted.
    event SoldOut(bytes32 indexed paymentId, address indexed recipient, uint256 quantity);
    /// @dev The authorization for `paymentId` did not settle: nothing was charged or minted and the
    /// id stays unminted. `reason` is USDC's revert data, as returned.
    event SettlementFailed(bytes32 indexed paymentId, address indexed from, bytes reason);
    event MaxMintsSet(uint256 maxMints);
    event Refunded(bytes32 indexed paymentId, address indexed to, uint256 value);
    /// @dev Nothing was paid. `reason` is USDC's revert data: a used authorization means this
    /// payment's refund from `from` was already paid (perhaps submitted by someone else).
    event RefundFailed(bytes32 indexed paymentId, address indexed from, bytes reason);

    error EmptyBatch();
    error LengthMismatch(uint256 recipients, uint256 paymentIds, uint256 quantities);
    error ZeroMintAmount();
    error ZeroAdmin();
    error MaxMintsBelowTotal(uint256 maxMints, uint256 totalMints);
    /// @dev A USDC call failed with too little gas left to tell whether it failed for want of gas.
    error SettlementOutOfGas();

    constructor(string memory name_, string memory symbol_, uint256 mintAmount_, address admin)
        ERC20(name_, symbol_)
    {
        if (mintAmount_ == 0) revert ZeroMintAmount();
        if (admin == address(0)) revert ZeroAdmin();
        mintAmount = mintAmount_;
        _supplyMints = type(uint256).max / mintAmount_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Caps the mints this token may ever make. It may not go below {totalMints}, which
    /// would make what is minted an oversell; setting it to {totalMints} sells out at once.
    /// @dev nonReentrant: lowered inside a batch's USDC call, the cap would be stale in that batch.
    function setMaxMints(uint256 maxMints_) external onlyRole(DEFAULT_ADMIN_ROLE) nonReentrant {
        uint256 total = totalMints;
        if (maxMints_ < total) revert MaxMintsBelowTotal(maxMints_, total);
        maxMints = maxMints_;
        emit MaxMintsSet(maxMints_);
    }

    /// @notice Mints `quantities[i] * mintAmount` to `recipients[i]` for `paymentIds[i]`. Ids
    /// already minted, zero recipients and zero quantities are skipped with {MintSkipped}, leaving
    /// their ids unminted; an entry that does not fit under {maxMints} emits {SoldOut} and later
    /// ones that still fit are minted.
    /// @dev nonReentrant so that it cannot run inside {batchSettleAndMint}'s USDC call, between
    /// that batch's reading of {totalMints} and its writing it back.
    function batchMint(
        address[] calldata recipients,
        bytes32[] calldata paymentIds,
        uint256[] calldata quantities
    ) external onlyRole(MINTER_ROLE) nonReentrant {
        uint256 n = recipients.length;
        if (n != paymentIds.length || n != quantities.length) {
            revert LengthMismatch(n, paymentIds.length, quantities.length);
        }
        if (n == 0) revert EmptyBatch();
        uint256 amount = mintAmount;
        uint256 limit = _mintLimit();
        uint256 total = totalMints;
        for (uint256 i; i < n;) {
            address recipient = recipients[i];
            bytes32 paymentId = paymentIds[i];
            uint256 quantity = quantities[i];
            if (recipient == address(0) || quantity == 0 || minted[paymentId]) {
                emit MintSkipped(paymentId, recipient);
            } else if (quantity > limit - total) {
                emit SoldOut(paymentId, recipient, quantity);
            } else {
                uint256 minting;
                // Cannot overflow: quantity fits under the limit, and the limit is at most
                // _supplyMints, so total + quantity <= limit and quantity * amount <= max uint256.
                unchecked {
                    total += quantity;
                    minting = quantity * amount;
                }
                minted[paymentId] = true;
                _mint(recipient, minting);
                emit Minted(paymentId, recipient, minting);
            }
            unchecked {
                ++i;
            }
        }
        totalMints = total;
    }

    /// @notice The payment id of the EIP-3009 authorization (`from`, `nonce`) on `usdc` on this
    /// chain: keccak256(abi.encode(chainid, usdc, from, nonce)), as mintq computes it off chain.
    /// An authorization can settle only once, so it is one payment and gets one id.
    function authorizationPaymentId(address usdc, address from, bytes32 nonce)
        public
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(block.chainid, usdc, from, nonce));
    }

    /// @notice For each item: settles its authorization to `payTo` on `usdc` and mints
    /// `quantity * mintAmount` only if that succeeded, so a payer is charged exactly when minted
    /// for. Ids already minted, zero recipients, zero quantities and authorizations whose
    /// `paymentId` is not their {authorizationPaymentId} are skipped with {MintSkipped}, and items
    /// that do not fit under {maxMints} emit {SoldOut}, both before settling (their authorizations
    /// stay unused); a failed settlement emits {SettlementFailed} and the batch goes on. The id
    /// check is what keeps one authorization from being settled and minted for under two ids,
    /// whoever chose them.
    /// @dev nonReentrant because the cap and the dedupe are checked before each USDC call and
    /// recorded after it, and `usdc` is whatever address the minter names: nothing may mint or
    /// move the cap in between.
    function batchSettleAndMint(address usdc, address payTo, MintItem[] calldata items)
        external
        onlyRole(MINTER_ROLE)
        nonReentrant
    {
        uint256 n = items.length;
        if (n == 0) revert EmptyBatch();
        uint256 amount = mintAmount;
        uint256 limit = _mintLimit();
        uint256 total = totalMints;
        for (uint256 i; i < n;) {
            MintItem calldata item = items[i];
            address recipient = item.recipient;
            bytes32 paymentId = item.paymentId;
            uint256 quantity = item.quantity;
            address from = item.from;
            if (
                recipient == address(0) || quantity == 0
                    || (from != address(0) && paymentId != authorizationPaymentId(usdc, from, item.nonce))
                    || minted[paymentId]
            ) {
                emit MintSkipped(paymentId, recipient);
            } else if (quantity > limit - total) {
                // Checked before settling: a payer is never charged for what cannot be minted.
                emit SoldOut(paymentId, recipient, quantity);
            } else if (from == address(0) || _settle(usdc, payTo, item)) {
                uint256 minting;
                // Cannot overflow, as in {batchMint}.
                unchecked {
                    total += quantity;
                    minting = quantity * amount;
                }
                minted[paymentId] = true;
                _mint(recipient, minting);
                emit Minted(paymentId, recipient, minting);
            }
            unchecked {
                ++i;
            }
        }
        totalMints = total;
    }

    /// @notice The nonce of the refund wallet's authorization that refunds `paymentId`:
    /// keccak256(abi.encode(keccak256("mintq.refund"), paymentId)). One payment has one refund
    /// nonce, and USDC accepts a (from, nonce) once, so a refund wallet pays a payment's refund
    /// at most once, however often it signs it.
    function refundNonce(bytes32 paymentId) public pure returns (bytes32) {
        return keccak256(abi.encode(_REFUND_NONCE_DOMAIN, paymentId));
    }

    /// @notice Submits each refund wallet authorization to pay `to` back, with the nonce derived
    /// from its payment id: {Refunded} when USDC moved the money, else {RefundFailed} and the
    /// batch goes on. The refund wallet only signs and needs no ETH; whatever crashes, retries and
    /// re-sent transactions happen, USDC refuses the second use of a refund's nonce.
    /// @dev The contract keeps no record of refunds: USDC's authorization state is the record.
    /// At most once holds per refund wallet: another wallet signing the same payment's refund
    /// has a nonce of its own.
    function batchRefund(address usdc, Refund[] calldata refunds) external onlyRole(MINTER_ROLE) {
        uint256 n = refunds.length;
        if (n == 0) revert EmptyBatch();
        for (uint256 i; i < n;) {
            Refund calldata refund = refunds[i];
            try IUSDC(usdc).transferWithAuthorization{gas: SETTLEMENT_GAS}(
                refund.from,
                refund.to,
                refund.value,
                0,
                refund.validBefore,
                refundNonce(refund.paymentId),
                refund.signature
            ) {
                emit Refunded(refund.paymentId, refund.to, refund.value);
            } catch (bytes memory reason) {
                _revertIfOutOfGas();
                emit RefundFailed(refund.paymentId, refund.from, reason);
            }
            unchecked {
                ++i;
            }
        }
    }

    /// @dev The cap in force: {maxMints}, or fewer if that many mints would overflow the supply.
    function _mintLimit() private view returns (uint256) {
        uint256 limit = maxMints;
        return limit < _supplyMints ? limit : _supplyMints;
    }

    function _settle(address usdc, address payTo, MintItem calldata item) private returns (bool) {
        try IUSDC(usdc).transferWithAuthorization{gas: SETTLEMENT_GAS}(
            item.from, payTo, item.value, item.validAfter, item.validBefore, item.nonce, item.signature
        ) {
            return true;
        } catch (bytes memory reason) {
            _revertIfOutOfGas();
            emit SettlementFailed(item.paymentId, item.from, reason);
            return false;
        }
    }

    /// @dev Called when a USDC call given SETTLEMENT_GAS has failed. EIP-150 forwards at most 63/64
    /// of the gas left, so near the end of the gas limit the call may have been given less than
    /// SETTLEMENT_GAS. Had it been, less than 1/64 of that would be left now: the failure may be
    /// the gas limit's doing, not the item's, so fail the whole transaction instead. Item outcomes
    /// then never depend on the gas limit, and gas estimation finds a limit that lets every item
    /// that can succeed succeed.
    function _revertIfOutOfGas() private view {
        if (gasleft() < SETTLEMENT_GAS / 63) revert SettlementOutOfGas();
    }
}
